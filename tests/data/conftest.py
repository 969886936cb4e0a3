"""The data tests share the session fixtures of ``tests/conftest.py``
(``tokenizer``, ``data_dir``)."""
