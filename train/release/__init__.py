"""Importing the authors' released APTP sets (``aptp-import``): layout mapping, strict reading,
the authors' routing rule, the importer and a synthetic release writer for tests."""
