"""``python -m hero_compute.cli``: the same as the ``hero-compute`` command."""

from . import main

main()
