"""FractureNode service: Flask portal, REST API, ingest, workers and the command line."""

__version__ = "0.1.0"
