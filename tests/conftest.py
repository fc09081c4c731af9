"""Shared pytest setup.

Its presence matters: ``tests`` is a package, so pytest puts the repository
root on ``sys.path`` when it loads this file, which makes helpers such as
``tests.distributed.utils`` importable from every tier (and from the
processes those helpers spawn, which inherit ``sys.path``).
"""
