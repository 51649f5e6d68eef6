"""``python -m wsurgery ...`` and ``torchrun -m wsurgery train ...`` run the command-line app."""

from wsurgery.cli.main import main

if __name__ == "__main__":
    main()
