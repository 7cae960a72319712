"""Methods: the math of each job and the streamed passes that apply it (no file I/O)."""
