"""File and device I/O shared by the library and the command line (no model or metric code)."""
