from trackpipe.cli import main

raise SystemExit(main())
