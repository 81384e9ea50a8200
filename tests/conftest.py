"""Test-suite root: makes ``tests/`` importable so test modules share helpers such as
``shared_data.SHARED_DATA`` (pytest puts a rootdir conftest's folder on sys.path)."""
