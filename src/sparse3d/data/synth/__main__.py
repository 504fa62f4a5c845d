"""``python -m sparse3d.data.synth``: see :mod:`sparse3d.data.synth.cli`."""

from sparse3d.data.synth.cli import main

raise SystemExit(main())
