"""`python -m peftlab` and `accelerate launch -m peftlab` enter here.

The guard matters: a library that starts a helper process by spawning (MLflow's tracker
does) imports the main module again in it, and without the guard that child would run the
whole command a second time."""

from peftlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
