"""The queue: what it knows of a message (envelope), retry timing (schedule), the runner."""
