"""``python -m pipeline.altsim``: the ``altsim`` command."""

from pipeline.altsim.cli import main

if __name__ == "__main__":
    main()
