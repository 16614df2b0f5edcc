"""`python -m relay`: the same command as `relay` (relay.ops.cli); the worker supervisor
starts its workers this way."""

from relay.ops.cli import main

raise SystemExit(main())
