"""The vocabulary every protocol engine shares: line framing, dot-stuffing, SMTP replies."""
