"""aptp.train."""
