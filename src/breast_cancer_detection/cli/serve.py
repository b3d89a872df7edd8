"""`bcd serve`: the web app for one model; its limits default to the server's own."""

from __future__ import annotations

import argparse
import sys

from . import common, options


def add_parser(sub) -> None:
    """`bcd serve`: its options."""
    sv = sub.add_parser("serve", help="the web app: upload images, see the answer and why",
                        description="Serve the page and the API (POST /api/predict, GET "
                        "/api/health, GET /api/model, GET /api/slides with --slides; the "
                        "OpenAPI schema at /openapi.json) for one checkpoint, "
                        "loaded once: a checkpoint, a named trained model, or by default "
                        "the default trained model (`bcd models --trained`). A research tool, "
                        "not a medical device.")
    options.checkpoint(sv, "best.pt from `bcd train`, a URL of one, model.onnx (no Grad-CAM), "
                       "or a trained model's name (default: the default trained model)",
                       optional=True)
    options.trained_model(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: "
                    "this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="(default 8000)")
    sv.add_argument("--report", metavar="METRICS_JSON", help="metrics.json of `bcd evaluate` "
                    "for this checkpoint: the model card then shows test metrics with CIs")
    from ..app.limits import TILE_UNIT, ServeLimits

    limits = ServeLimits()  # the server's own defaults, so help and behaviour cannot differ
    sv.add_argument("--max-upload-mb", type=float, default=limits.max_upload_mb,
                    help=f"largest upload per request, in MB (default {limits.max_upload_mb:g}; "
                    "413 beyond)")
    sv.add_argument("--max-concurrency", type=int, default=limits.max_concurrency,
                    help=f"requests processed at once (default {limits.max_concurrency})")
    sv.add_argument("--max-queue", type=int, default=limits.max_queue,
                    help=f"requests allowed to wait (default {limits.max_queue}; 503 with "
                    "Retry-After beyond)")
    options.max_pixels(sv)
    sv.add_argument("--max-request-megapixels", type=float,
                    default=limits.max_request_megapixels, metavar="MP",
                    help="pixels one request may cost, in millions: each image decoded plus "
                    "resized for the model, checked from the headers (default "
                    f"{limits.max_request_megapixels:g}; 413 beyond)")
    sv.add_argument("--max-request-tiles", type=int, default=limits.max_request_tiles,
                    metavar="N", help="model passes one request's large (tiled) images may "
                    f"need, over {TILE_UNIT} px squares (smaller tiles count by their area; "
                    f"default {limits.max_request_tiles}; 413 beyond)")
    sv.add_argument("--upload-timeout", type=float, default=limits.upload_timeout,
                    metavar="SECONDS", help="time a client has to send its request body "
                    f"(default {limits.upload_timeout:g}; 408 beyond)")
    sv.add_argument("--header-timeout", type=float, default=limits.header_timeout,
                    metavar="SECONDS", help="time a connection has to send a complete request "
                    "head, from when it opens or from its previous answer (default "
                    f"{limits.header_timeout:g}; closed beyond)")
    sv.add_argument("--max-uploads", type=int, default=limits.max_uploads, metavar="N",
                    help="requests that may be sending their body at once; they hold no model "
                    f"slot or queue place (default {limits.max_uploads}; 503 beyond)")
    sv.add_argument("--allowed-hosts", metavar="NAMES", help="comma-separated host names the "
                    "server answers to, besides IP addresses, localhost and --host (a guard "
                    "against DNS rebinding); '*' answers any")
    sv.add_argument("--slides", metavar="DIR", help="show the results of `bcd slide --out DIR`: "
                    "each slide's heat map, regions and top tiles")
    options.sha256(sv)
    options.device(sv)
    options.backend(sv)
    options.quiet(sv, "no progress bar or request log")
    sv.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`bcd serve`: load the model, then serve until Ctrl-C."""
    from ..errors import UserError, install_hint

    try:
        import uvicorn

        from ..app.server import create_app, uvicorn_options
    except ImportError as e:
        raise UserError(f"`bcd serve` needs the web app's packages ({e.name} is missing): "
                        f"{install_hint('app')}.") from e
    _port_free(args.host, args.port)
    common.model_choice(args)
    predictor = common.load_predictor(args)  # loaded before serving, so a bad file fails here
    # The bound name is answered to as well as IP addresses and localhost (DNS rebinding).
    hosts = [h for h in (args.allowed_hosts or "").split(",") if h.strip()] + [args.host]
    app = create_app(predictor, report=args.report, max_upload_mb=args.max_upload_mb,
                     max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                     max_request_megapixels=args.max_request_megapixels,
                     max_request_tiles=args.max_request_tiles,
                     upload_timeout=args.upload_timeout, max_uploads=args.max_uploads,
                     allowed_hosts=hosts, slides=args.slides, backend=args.backend)
    # Connections that send no request head are closed; past the app's places, uvicorn's 503.
    options = uvicorn_options(app, header_timeout=args.header_timeout)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: --host {args.host} makes the app reachable from other machines; it "
              "has no authentication.", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {predictor.arch} at "
          f"http://{host}:{args.port}/ (API schema at /openapi.json); Ctrl-C stops it. Images "
          f"are scored with {app.state.service.scorer.backend_note}"
          + ("; Grad-CAM with PyTorch." if predictor.backend == "torch" else "."))
    if args.slides:
        print(f"Whole slides: the results of `bcd slide ... --out {args.slides}`, on the page "
              "and at /api/slides.")
    uvicorn.run(app, host=args.host, port=args.port,
                log_level="warning" if args.quiet else "info", **options)
    return 0


def _port_free(host: str, port: int) -> None:
    """Refuses, before the model loads, a port that another program holds."""
    import socket

    from ..errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): another "
                            "program (another `bcd serve`?) holds that port, or the address is "
                            "not this machine's. Pick another with --port.") from e
