"""aptp.export."""
