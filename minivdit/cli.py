"""How the scripts in samplers/ end: `run(main)` turns errors the user can fix into one line and exit status 2.

    if __name__ == "__main__":
        run(main)

* an error the user can fix (a ValueError such as checkpoints.CheckpointError, a refused output path, a missing
  or unreadable file): `error: <message>` on stderr, exit status 2, no traceback (`--debug` shows it);
* non-finite values found during a run (pipeline.NonFiniteError): `error: <where>`, exit status 1;
* Ctrl-C or SIGTERM: `interrupted`, exit status 130 / 143; outputs are written atomically (video.atomic_write),
  so nothing half-written or temporary is left;
* anything else is a bug: its traceback is shown as usual;
* warnings (a truncated prompt) print as `warning: <message>`.
"""
from __future__ import annotations

import signal
import sys
import warnings

USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
               PermissionError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so the same cleanup as Ctrl-C runs (finally blocks, atomic writes)."""


def _terminate(signum, frame):
    raise Terminated()


def run(main, argv: list[str] | None = None) -> None:
    """Call main(argv) and exit as described in the module docstring."""
    from .pipeline import NonFiniteError  # the scripts import the pipeline anyway

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    formatwarning, warnings.formatwarning = warnings.formatwarning, lambda m, *a, **k: f"warning: {m}\n"
    try:
        main(argv)
    except KeyboardInterrupt as e:
        print("interrupted: no output written for the unfinished run", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except NonFiniteError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        warnings.formatwarning = formatwarning
