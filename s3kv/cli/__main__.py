"""``python -m s3kv.cli``: the same entry point as the ``s3kv`` script."""

from s3kv.cli.app import main

if __name__ == "__main__":
    main()
