"""Starting a stage as a person's terminal does, for the tests that press Ctrl-C."""
from __future__ import annotations

import signal


def sigint_as_in_a_terminal() -> None:
    """preexec_fn: the child's SIGINT back to the default action. A process started in the
    background by a non-interactive shell (`cmd &`, nohup, some CI runners) ignores SIGINT, and the
    ignoring is inherited through exec: Python then installs no KeyboardInterrupt handler, and a
    Ctrl-C test would wait for a process that never hears it. A terminal's foreground job has the
    default action, which is the case these tests are about."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
