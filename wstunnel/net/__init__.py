"""trio I/O: the session transport, channel streams, splicing and dialling."""
