"""`python -m peftlab` and `accelerate launch -m peftlab` enter here."""

from peftlab.cli import main

raise SystemExit(main())
