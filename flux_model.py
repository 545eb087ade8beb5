"""FLUX.1 in one file: transformer, autoencoder, text conditioning and weight loading."""


class InputError(Exception):
    """Bad user input (a missing file, a wrong key or shape, a bad flag): srpo.py prints it on one line, exit 2."""
