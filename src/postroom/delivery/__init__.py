"""Outbound and local delivery: routing, the SMTP client glue and bounce reports."""
