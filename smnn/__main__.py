from smnn.cli import main

raise SystemExit(main())
