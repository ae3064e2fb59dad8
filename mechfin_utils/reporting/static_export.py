"""Static figures: a plotly figure as PNG and SVG bytes, through kaleido and a headless Chrome/Chromium.

:func:`mechfin_utils.reporting.figures.save_figure` writes every figure's interactive HTML itself and asks this module
for the static copies. What it decides, once, so that saving is fast, deterministic and fails loudly:

One browser per process
    kaleido 1.x drives a headless Chrome/Chromium, and starting one costs seconds. A single kaleido sync server is
    started lazily on the first export of the process and reused; it is stopped at exit (or by
    :func:`stop_static_export`). Which browser: ``$BROWSER_PATH`` when set, else the one kaleido finds
    (:func:`find_browser`).
Deterministic bytes
    Fixed width, height and scale (the figure's own ``layout.width/height`` when set, else :data:`DEFAULT_WIDTH` x
    :data:`DEFAULT_HEIGHT`; PNG at scale :data:`PNG_SCALE`), MathJax off, fixed trace uids, and the random figure id
    plotly.js writes into SVG element ids replaced by a fixed one (:func:`normalise_svg`), so saving the same figure
    twice gives the same bytes.
Never a hang
    Each export runs in a helper thread, watched: a browser that fails to start, dies or hangs raises
    :class:`StaticExportUnavailableError` within :data:`STATIC_TIMEOUT_S` (at once when kaleido's server thread has
    died), and every later export in the process raises the same error at once.
No Chromium
    :class:`StaticExportUnavailableError` with :data:`CHROMIUM_HOW_TO`: how to install one. ``MECHFIN_STATIC_FIGURES=0``
    turns static export off on purpose (:func:`static_export_enabled`); figures are then written as HTML only.
"""

from __future__ import annotations

import atexit
import os
import queue
import re
import threading
from typing import Any

STATIC_ENV = "MECHFIN_STATIC_FIGURES"

DEFAULT_WIDTH = 900
DEFAULT_HEIGHT = 550
PNG_SCALE = 2
STATIC_TIMEOUT_S = 180.0
"""How long one static export may take before it is declared stuck (the first includes Chromium's start)."""

CHROMIUM_HOW_TO = (
    "PNG/SVG export (kaleido 1.x) needs Chrome or Chromium, and none was found.\n"
    "  - Debian/Ubuntu: `apt-get install chromium` (or run `make setup` as root, which does it);\n"
    "  - macOS: `brew install --cask chromium` or install Google Chrome;\n"
    "  - anywhere with network access: `python -c 'import kaleido; kaleido.get_chrome_sync()'`;\n"
    "  - a browser in an unusual place: set BROWSER_PATH=/path/to/chrome.\n"
    f"The interactive .html figure was written. To write HTML only on purpose, set {STATIC_ENV}=0."
)


class StaticExportUnavailableError(RuntimeError):
    """PNG/SVG export cannot run here (no Chrome/Chromium, or the browser failed); the message says why."""


# ---------------------------------------------------------------------------------------------------------
# The browser, and one kaleido server per process
# ---------------------------------------------------------------------------------------------------------

_static_lock = threading.Lock()
_static_state: dict[str, Any] = {"started": False, "broken": None, "atexit": False}


def static_export_enabled() -> bool:
    """False only when ``$MECHFIN_STATIC_FIGURES`` is set to 0/false/no/off (HTML-only, deliberately)."""
    return os.environ.get(STATIC_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def find_browser() -> str | None:
    """The Chrome/Chromium kaleido would use (honours ``$BROWSER_PATH``), or None."""
    from choreographer.browsers.chromium import Chromium

    override = os.environ.get("BROWSER_PATH")
    if override:
        return override if os.path.isfile(override) and os.access(override, os.X_OK) else None
    return Chromium.find_browser(skip_local=False)


def _ensure_static_server() -> None:
    """Start the process-wide kaleido sync server if it is not running (caller holds the lock)."""
    if _static_state["broken"]:
        raise StaticExportUnavailableError(_static_state["broken"])
    if _static_state["started"]:
        return
    browser = find_browser()
    if browser is None:
        raise StaticExportUnavailableError(CHROMIUM_HOW_TO)
    import kaleido

    # mathjax=False: kaleido would otherwise load MathJax from a CDN, which offline only costs time.
    kaleido.start_sync_server(n=1, timeout=STATIC_TIMEOUT_S, mathjax=False, path=browser, silence_warnings=True)
    _static_state["started"] = True
    if not _static_state["atexit"]:
        atexit.register(stop_static_export)
        _static_state["atexit"] = True


def stop_static_export() -> None:
    """Stop the kaleido server (and its Chromium) if this module started it; a later export restarts it."""
    with _static_lock:
        if _static_state["started"] and not _static_state["broken"]:
            import kaleido

            kaleido.stop_sync_server(silence_warnings=True)
        _static_state["started"] = False


def _kaleido_server_alive() -> bool:
    """Whether kaleido's server thread still runs. When its browser fails to start, that thread ends with a
    traceback but kaleido's sync call would wait forever; this lets us fail fast instead. It reads a private
    attribute of kaleido 1.5 and answers True (so that only the timeout applies) if that ever changes."""
    import kaleido

    thread = getattr(getattr(kaleido, "_global_server", None), "_thread", None)
    return thread.is_alive() if isinstance(thread, threading.Thread) else True


# ---------------------------------------------------------------------------------------------------------
# One export
# ---------------------------------------------------------------------------------------------------------


def render_static(fig_dict: dict, *, fmt: str, width: int, height: int, scale: float) -> bytes:
    """One PNG/SVG through the shared server, in a helper thread so that a dead browser cannot hang us."""
    import kaleido

    answer: queue.Queue = queue.Queue(maxsize=1)

    def work() -> None:
        try:
            answer.put(kaleido.calc_fig_sync(fig_dict, opts=dict(format=fmt, width=width, height=height, scale=scale)))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            answer.put(exc)

    with _static_lock:
        _ensure_static_server()
        worker = threading.Thread(target=work, name="mechfin-static-export", daemon=True)
        worker.start()
        waited = 0.0
        while worker.is_alive() and waited < STATIC_TIMEOUT_S + 10:
            worker.join(0.25)
            waited += 0.25
            if worker.is_alive() and not _kaleido_server_alive():
                worker.join(0.5)  # the answer may just be arriving
                if worker.is_alive():
                    break
        if worker.is_alive():
            _static_state["broken"] = (
                f"kaleido's browser failed to start, died or hung (browser: {find_browser()}); no answer after "
                f"{waited:.1f} s (its own traceback is printed above). Restart the Python process, or set "
                f"{STATIC_ENV}=0 to write HTML only."
            )
            raise StaticExportUnavailableError(_static_state["broken"])
    result = answer.get()
    if isinstance(result, BaseException):
        raise StaticExportUnavailableError(f"kaleido failed to export {fmt.upper()}: {result!r}") from result
    return result


_SVG_UID_RE = re.compile(r'id="defs-([0-9a-z]+)"')


def normalise_svg(svg: str) -> str:
    """Replace the random figure id plotly.js puts into SVG element ids (``clip3f2a1b...``) by a fixed one."""
    match = _SVG_UID_RE.search(svg)
    if match is None:
        return svg
    uid = re.escape(match.group(1))
    return re.sub(r"""(id="[A-Za-z-]*|url\(['"]?#[A-Za-z-]*)""" + uid, r"\g<1>mfig00", svg)


def static_figure_dict(fig) -> dict:
    """The figure as a dict, with fixed trace uids (plotly.js would draw random ones into SVG ids)."""
    fig_dict = fig.to_dict()
    for index, trace in enumerate(fig_dict.get("data", [])):
        trace.setdefault("uid", f"trace{index}")
    return fig_dict


def export_size(fig, width: int | None, height: int | None) -> tuple[int, int]:
    """The static size in layout pixels: the ones asked for, else the figure's own, else the defaults."""
    width = width or fig.layout.width or DEFAULT_WIDTH
    height = height or fig.layout.height or DEFAULT_HEIGHT
    return int(width), int(height)


def static_figure(fig, *, width: int | None = None, height: int | None = None) -> dict[str, bytes]:
    """``{"png": ..., "svg": ...}``: the figure's static bytes (PNG at :data:`PNG_SCALE`, SVG with fixed ids).

    Raises :class:`StaticExportUnavailableError` when no browser can export (see the module docstring)."""
    width, height = export_size(fig, width, height)
    fig_dict = static_figure_dict(fig)
    png = render_static(fig_dict, fmt="png", width=width, height=height, scale=PNG_SCALE)
    svg = render_static(fig_dict, fmt="svg", width=width, height=height, scale=1)
    return {"png": png, "svg": normalise_svg(svg.decode("utf-8")).encode("utf-8")}
