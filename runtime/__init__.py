"""aptp.runtime."""
