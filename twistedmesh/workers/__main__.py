"""
C{python -m twistedmesh.workers} (its SPEC on standard input): the entry point of one worker process
(see L{child.main}).
"""

from .child import main

if __name__ == "__main__":
    main()
