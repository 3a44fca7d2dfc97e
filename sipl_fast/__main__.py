"""``python -m sipl_fast`` (also under ``torchrun -m sipl_fast``): the sipl-fast command line."""
from .cli import main

if __name__ == "__main__":
    main()
