from relay.ops.cli import main

raise SystemExit(main())
