"""Every error a user of vramsupply can meet, under one root, each carrying its CLI exit code.

Why one tree: the command line has exactly one place that turns an error into what a person sees
(``cli.main``: one readable line on stderr, then ``exit_code``). Commands stay thin and never catch
errors themselves; a module raises the most specific class below and its message is the whole
story, written for the person at the terminal (or in the journal).

The tree, with where each class lives (each concern's base is defined next to its code, so a
module never imports another concern to raise its own errors)::

    VramsupplyError                      exit 1  errors.py
    ├── ConfigError                      exit 2  errors.py: a setting, or a combination of
    │   │                                        settings, is invalid; names it and its source
    │   ├── MissingSetting               exit 2  errors.py: a setting the command cannot do without
    │   │                                        is unset (the model to plan, the API key)
    │   ├── OfferError                   exit 2  platform/offer.py: what would be offered to the
    │   │                                        market is invalid (endpoint URL, context)
    │   ├── GpuOptionError               exit 2  gpu/options.py: a GPU or KV cache option this
    │   │                                        llama.cpp build or model cannot honour
    │   └── UnknownUser                  exit 2  userpath.py: a path's ~name names no user
    ├── ConfigUnwritable                 exit 1  config/file.py: the config file cannot be written
    ├── HubError                         exit 1  hub/errors.py: the model cannot be made local
    │   ├── InvalidModelSpec             exit 2  the model argument (or the quant) is malformed:
    │   │                                        no org/model id the Hub accepts, no local path
    │   ├── ModelFileError, ModelNotFound, QuantNotFound, HubAuthError,
    │   │   HubUnreachable, HubOffline, InsufficientDiskSpace
    │   └── DownloadError
    │       └── ChecksumMismatch
    ├── PlatformError                    exit 1  platform/client.py: the platform said no, or
    │   │                                        cannot be reached
    │   ├── ApiKeyRejected, RequestRejected, UnknownProvider, PlatformUnavailable,
    │   │   UnexpectedAnswer                       a 2xx whose body is not the documented answer
    ├── EndpointTokenError               exit 1  platform/token.py: the generated endpoint token
    │                                            cannot be kept or read back (the data dir)
    ├── EngineError                      exit 1  engine/types.py: llama.cpp or the scheduler
    │   ├── Overloaded, EngineClosed, ContextOverflow   (per request: the HTTP API maps them)
    │   ├── LoadAbandoned                          engine/model.py: a stop came while the model loaded
    │   └── EngineFailed                           the engine died or stalled while serving
    ├── PlanRefused                      exit 1  gpu/planning.py: the model does not fit the memory
    ├── SourceError                      exit 1  gpu/source.py: the model cannot be read to plan
    │   └── SourceUnreachable
    ├── UpstreamError                    exit 1  upstream/backend.py: vLLM, SGLang or the upstream
    │                                            server cannot be used as configured
    ├── ServeError                       exit 1  serve/options.py: serving cannot start (a tunnel)
    ├── BenchError                       exit 1  throughput/: `vramsupply bench` cannot measure
    ├── LedgerError                      exit 1  ledger/errors.py: the earnings ledger cannot be read
    │   ├── DamagedLedger                          ledger/errors.py: the file is damaged (the agent
    │   │                                          moves it aside at start; says how to salvage it)
    │   └── Unwritten                              ledger/writer.py: a row held in memory until the
    │                                              file takes it (never reaches the CLI)
    ├── TunnelError                      exit 1  tunnel/errors.py: the --tunnel tool is unknown or
    │                                            not installed (says how to install it)
    ├── ServiceError                     exit 1  service/unit.py: systemd unit handling
    ├── ListenError                      exit 1  errors.py: a server cannot listen on its address
    ├── DataDirInUse                     exit 1  instance_lock.py: another agent serves from this
    │                                            data dir
    ├── DemoError                        exit 1  devplatform/demo.py: `serve --demo` failed
    └── Interrupted                      exit 130 errors.py: stopped by a signal before it could
                                                 finish cleanly

Errors a request makes on the HTTP API are not here: they are answered as OpenAI error JSON by
``server/errors.py`` and never end the process.
"""

from __future__ import annotations

import errno


class VramsupplyError(Exception):
    """Root of every user-facing error. ``str(error)`` is one line that says what to do."""

    exit_code: int = 1


class ConfigError(VramsupplyError):
    """A setting (or two settings together) is invalid; the message names them and their source."""

    exit_code = 2


class MissingSetting(ConfigError):
    """A setting the command needs is not set anywhere (flag, environment, config file): a usage
    error like any invalid setting (exit 2), said before any download, load or call, with where to
    set it. Exit 1 stays for what goes wrong once the command runs (``plan``: nothing fits)."""


class ListenError(VramsupplyError):
    """``serve`` or ``devplatform`` cannot listen on its host and port (in use, no permission)."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 literal, as in a URL
        taken = "; another program listens there: choose another --port (0: any free one)" if exc.errno == errno.EADDRINUSE else ""
        super().__init__(f"cannot listen on {where}: {exc.strerror or exc}{taken}")


class Interrupted(VramsupplyError):
    """Ctrl-C or SIGTERM ended a command before it could finish or drain (128 + SIGINT)."""

    exit_code = 130
