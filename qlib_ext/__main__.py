"""``python -m qlib_ext`` = the ``qlib-ext`` command."""

from qlib_ext.cli import main

if __name__ == "__main__":
    main()
