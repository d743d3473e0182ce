"""`vramsupply models ...`: GGUFs in the shared HuggingFace cache."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Optional

import typer

from vramsupply.config import Settings

from .app import CACHE_DIR_OPTION, JSON_OPTION, QUANT_OPTION, console, err_console, fail, models_app, settings_from

if TYPE_CHECKING:
    from vramsupply.hub.cache import CachedModel


def quant_serve_would_choose(model: str, settings: Settings) -> Settings:
    """Without a quant set (flag, environment or config file), `serve` takes the best quant that
    fits this machine (``gpu/planning.py``); resolve and pull then take the same one, so that what
    is pulled ahead is what serve loads. When no plan can be made, the quant setting, said."""
    from vramsupply.errors import VramsupplyError
    from vramsupply.gpu.planning import fit_before_download
    from vramsupply.hub import InvalidModelSpec, is_local_path

    if "quant" in settings.model_fields_set or is_local_path(model):
        return settings
    try:
        chosen = fit_before_download(settings.model_copy(update={"model": model}), set(settings.model_fields_set)).quant
    except InvalidModelSpec:  # a malformed model argument: the command's own usage error, said once
        raise
    except VramsupplyError as exc:  # the model cannot be read to plan (the pull then says why, if it fails too), or nothing fits
        if exc.__cause__ is None:
            err_console.print(f"{exc} (serve would refuse it here); taking the quant setting, {settings.quant}", soft_wrap=True)
        return settings
    if chosen != settings.quant:  # said only where it differs from the quant setting, which people read about
        err_console.print(f"quant {chosen}: the one serve would choose on this machine (--quant chooses another)", soft_wrap=True)
    return settings.model_copy(update={"quant": chosen})


@models_app.command("resolve")
def models_resolve(
    model: str = typer.Argument(..., help="org/model, or the id of a GGUF repo."),
    quant: Optional[str] = QUANT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show which GGUF repo, commit and file(s) a model and quant resolve to, without downloading."""
    from vramsupply.hub import HubAccess, is_local_path
    from vramsupply.hub.resolve import resolve
    from vramsupply.hub.views import resolved_json, resolved_table

    if is_local_path(model):
        fail(f"{model} is a local path: only HuggingFace ids (org/model) are resolved (serve and models pull accept local paths)")
    settings = quant_serve_would_choose(model, settings_from({"quant": quant}))
    resolved = resolve(model, settings.quant, access=HubAccess.from_env(settings.download_timeout), publishers=settings.gguf_publishers)
    if as_json:
        console.print_json(json.dumps(resolved_json(resolved)))
    else:
        console.print(resolved_table(resolved))


@models_app.command("pull")
def models_pull(
    model: str = typer.Argument(..., help="org/model, a GGUF repo id, or a local .gguf path (checked only)."),
    quant: Optional[str] = QUANT_OPTION,
    cache_dir: Optional[str] = CACHE_DIR_OPTION,  # str: typer makes "" the current directory, Path(".")
    as_json: bool = JSON_OPTION,
) -> None:
    """Download and verify a model into the cache (resumes an interrupted download)."""
    from vramsupply.hub import prepare_configured
    from vramsupply.hub.errors import HubOffline
    from vramsupply.hub.views import local_model_json

    settings = quant_serve_would_choose(model, settings_from({"quant": quant, "cache_dir": cache_dir}))
    _check_local_file(model)
    try:
        local = prepare_configured(model, settings, progress=True)
    except HubOffline as exc:  # its advice is "download it once while online (models pull …)": this very command
        raise _pull_needs_the_hub(model, settings, exc) from exc
    if as_json:
        console.print_json(json.dumps(local_model_json(local)))
    else:
        console.print(" ".join(filter(None, (local.model_id, local.quant, "ready:", str(local.path)))), highlight=False, soft_wrap=True)


def _check_local_file(model: str) -> None:
    """A local file is "ready" only when serve could load it: its whole header read and checked as
    serve reads it (truncated, or a value llama.cpp aborts on), not its magic bytes alone."""
    from vramsupply.hub.local import is_local_path

    if is_local_path(model):
        from vramsupply.gpu.source import local_source

        local_source(model)


def _pull_needs_the_hub(model: str, settings: Settings, offline: Exception) -> Exception:
    """What a pull that found the Hub out of reach and nothing cached says: the Hub could not be
    reached and why (the ``HubUnreachable`` that led to the fallback, else offline mode), and to run
    the same pull again once online, not the generic "download it once while online" advice."""
    from vramsupply.hub import default_cache_dir
    from vramsupply.hub.errors import HubOffline, HubUnreachable
    from vramsupply.hub.quant import normalize_quant

    wanted = f"{model} {normalize_quant(settings.quant)}"
    cache = settings.cache_dir or default_cache_dir()
    unreachable = offline.__context__
    if isinstance(unreachable, HubUnreachable):
        return HubOffline(f"{unreachable}, and {cache} holds no verified copy of {wanted}: run this command again once the Hub can be reached")
    return HubOffline(f"HF_HUB_OFFLINE is set, and {cache} holds no verified copy of {wanted}: unset HF_HUB_OFFLINE and run this command again while online")


@models_app.command("list")
def models_list(cache_dir: Optional[str] = CACHE_DIR_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List the models vramsupply downloaded, with sizes and whether they are verified."""
    from vramsupply.hub import default_cache_dir, list_cached
    from vramsupply.hub.views import cached_json, cached_table

    cache = settings_from({"cache_dir": cache_dir}).cache_dir or default_cache_dir()
    models = list_cached(cache)
    if as_json:
        console.print_json(json.dumps(cached_json(models)))
    elif not models:
        console.print(f"no models downloaded by vramsupply in {cache}", highlight=False)
    else:
        console.print(cached_table(models, cache))


@models_app.command("rm")
def models_rm(
    model: Optional[str] = typer.Argument(None, help="org/model or GGUF repo id to remove (all its quants)."),
    remove_all: bool = typer.Option(False, "--all", help="Remove every model vramsupply downloaded."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    force: bool = typer.Option(False, "--force", help="Remove the model the running agent serves too (its next start downloads it again), and one being downloaded (that download fails)."),
    cache_dir: Optional[str] = CACHE_DIR_OPTION,  # str: typer makes "" the current directory, Path(".")
) -> None:
    """Remove downloaded models from the cache; files other tools still use are kept, and the model the running agent serves unless --force."""
    from rich.filesize import decimal

    from vramsupply.hub import default_cache_dir, list_cached, remove_cached

    if (model is None) == (not remove_all):
        fail("name one model (org/model or GGUF repo id) or pass --all")
    cache = settings_from({"cache_dir": cache_dir}).cache_dir or default_cache_dir()
    doomed = list_cached(cache, model)
    if not doomed:
        if remove_all:
            console.print(f"no models downloaded by vramsupply in {cache}", highlight=False)
            return
        fail(f"no downloaded model matches {model}; `vramsupply models list` shows what is in {cache}", code=1)
    doomed, spare = _spare_the_served_model(doomed, force)
    doomed = _spare_downloads(doomed, force)
    if not yes:
        if not sys.stdin.isatty():
            fail("refusing to delete models without confirmation: pass --yes")
        for item in doomed:
            console.print(f"  {item.model_id} {item.quant} ({item.repo_id}, {decimal(item.on_disk)})", highlight=False)
        if not typer.confirm(f"Remove {len(doomed)} model(s) from {cache}?"):
            fail("nothing removed", code=1)
    removed = remove_cached(cache, model, spare=spare, downloads_too=force)
    for item in removed:
        console.print(f"removed {item.model_id} {item.quant} ({item.repo_id}, {decimal(item.on_disk)})", highlight=False)


def _spare_downloads(doomed: list[CachedModel], force: bool) -> list[CachedModel]:
    """What to remove, without the models another process is downloading now (a `serve` starting,
    a `models pull`): removed, that download fails. One model named is refused (exit 1); with
    --all such models are kept, said in one line. ``--force`` removes them too."""
    busy = [item for item in doomed if item.downloading]
    if not busy or force:
        return doomed
    names = ", ".join(f"{item.model_id} {item.quant}" for item in busy)
    what = f"{names} {'is' if len(busy) == 1 else 'are'} being downloaded by another process (a `serve` starting, or `models pull`)"
    rest = [item for item in doomed if not item.downloading]
    if not rest:
        fail(f"{what}: let it finish, or stop it first; --force removes it anyway, and that download fails", code=1)
    err_console.print(f"keeping {names}: {what}; --force removes {'it' if len(busy) == 1 else 'them'} too", highlight=False, soft_wrap=True)
    return rest


def _spare_the_served_model(doomed: list[CachedModel], force: bool) -> tuple[list[CachedModel], str | None]:
    """What to remove, without the model the agent running on this data dir serves, and that model
    (None: nothing spared): removed, the agent's next start downloads it again, or cannot start
    offline. One model named is refused (exit 1); with --all it is kept, said in one line.
    ``--force`` removes it too."""
    from vramsupply.cli.local_agent import served_model

    served = served_model()
    if served is None or force:
        return doomed, None
    serves = served.model.lower()
    rest = [item for item in doomed if serves not in (item.model_id.lower(), item.repo_id.lower())]
    if len(rest) == len(doomed):
        return doomed, None
    what = f"the running agent (pid {served.pid}) serves {served.model}"
    then = "its next start would download it again (or could not start offline)"
    if not rest:
        fail(f"{what}: removed, {then}; stop the agent first, or pass --force to remove it anyway", code=1)
    err_console.print(f"keeping {served.model}: {what}; --force removes it too, and then {then}", highlight=False, soft_wrap=True)
    return rest, served.model
