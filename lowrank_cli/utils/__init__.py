"""Small shared helpers: progress reporting, logging, seeds."""
