"""`exfm tenants add|list|remove`: the tenant registry; on a running system, through its tenant manager."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from exfm_ray.errors import ConfigError
from jobs.settings import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("tenants", help="register, list and remove tenants (one student each)")
    cmd = p.add_subparsers(dest="tenants_command", required=True)

    def common(q) -> None:
        q.add_argument("--storage", type=Path, help="storage root (default EXFM_STORAGE or runs/store)")
        q.add_argument("--address", help="Ray cluster of a running system (default EXFM_RAY_ADDRESS or a local one)")

    a = cmd.add_parser("add", help="register a tenant; a running `exfm train`/`exfm run` starts its trainer at once")
    common(a)
    a.add_argument("name", help="tenant name")
    a.add_argument("--config", type=Path, help="tenant YAML (rows, features, student, variant, knobs, workers ...)")
    a.add_argument("--stream", type=Path, help="stream folder to validate against if nothing is augmented yet")
    a.add_argument("--replace", action="store_true", help="replace the config of a registered, idle tenant")
    a.set_defaults(run=run_add)

    ls = cmd.add_parser("list", help="registered tenants: status, progress, last metrics, served version")
    common(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(run=run_list)

    r = cmd.add_parser("remove", help="stop a tenant's training and serving (its files stay)")
    common(r)
    r.add_argument("name", help="tenant name")
    r.set_defaults(run=run_remove)


def storage_of(args) -> Path:
    return (args.storage or Settings().storage).resolve()


def tenant_config(name: str, path: Path | None) -> dict:
    from jobs.serve_cmd import load_yaml

    data = load_yaml(path) if path else {}
    if data.get("name", name) != name:
        raise ConfigError(f"{path}: field 'name' is {data['name']!r} but the command names tenant {name!r}")
    return {**data, "name": name}


def validate(cfg: dict, storage: Path, stream: Path | None, source: str):
    """Parse and check a tenant config against the augmented stream (or --stream) before anything runs."""
    from exfm_ray.das.store import AugmentedStore
    from exfm_ray.data.stream import read_spec
    from exfm_ray.tenants.config import TenantConfig, resolve

    tenant = TenantConfig.parse(cfg, source=source)
    spec = AugmentedStore(storage).spec() or (read_spec(stream) if stream else None)
    if spec is None:
        raise ConfigError(f"nothing augmented in {storage} yet: pass --stream to check the tenant against the stream")
    resolve(tenant, spec)
    return tenant


def _manager(args):
    from actors.launch import find_tenant_manager
    from jobs.cluster import try_connect

    if not try_connect(args.address or Settings().ray_address):
        return None
    return find_tenant_manager()


def run_add(args: argparse.Namespace) -> int:
    import ray

    from exfm_ray.tenants.registry import TenantRegistry

    storage = storage_of(args)
    tenant = validate(tenant_config(args.name, args.config), storage, args.stream, str(args.config or args.name))
    manager = _manager(args)
    if manager is not None:
        entry = ray.get(manager.add.remote(tenant.model_dump(mode="json"), args.replace))
        print(f"tenant {args.name} added (run {args.name}-g{entry['generation']}); the running manager started it")
    else:
        entry = TenantRegistry(storage).add(tenant, replace=args.replace)
        print(f"tenant {args.name} registered (run {entry.run_name}); `exfm train` will train it")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    import ray

    from exfm_ray.students.store import StudentStore
    from exfm_ray.tenants.registry import TenantRegistry

    storage = storage_of(args)
    manager = _manager(args)
    if manager is not None:
        ray.get(manager.remove.remote(args.name))
    else:
        TenantRegistry(storage).remove(args.name)
    served = StudentStore(storage).unpublish(args.name)
    print(
        f"tenant {args.name} removed: training stops after its current window"
        + ("; no longer served" if served else "")
    )
    return 0


def tenant_rows(storage: Path) -> list[dict]:
    from exfm_ray.students.store import StudentStore
    from exfm_ray.tenants.registry import TenantRegistry

    registry, store = TenantRegistry(storage), StudentStore(storage)
    out = []
    for name, entry in sorted(registry.entries().items()):
        history = registry.read_json(registry.metrics_path(name)) or []
        progress = registry.read_json(registry.progress_path(name)) or {}
        pub = store.latest(name)
        last = history[-1] if history else {}
        out.append(
            {
                "tenant": name,
                "status": entry.status,
                "run": entry.run_name,
                "rows_from": entry.config.rows or [name],
                "variant": entry.config.variant,
                "student_size": entry.config.student.size,
                "workers": entry.config.workers,
                "windows_trained": len(history),
                "last_window": last.get("window"),
                "last_ne": last.get("ne"),
                "last_auc": last.get("auc"),
                "served_version": pub.version if pub else None,
                "guard": entry.config.guard,
                "serving": last.get("guard_choice"),
                "guard_reason": last.get("guard_reason"),
                "last_control_ne": last.get("control_ne"),
                "phase": progress.get("phase"),
                "progress_age_s": round(time.time() - progress["updated_at"], 1) if progress else None,
            }
        )
    return out


def run_list(args: argparse.Namespace) -> int:
    rows = tenant_rows(storage_of(args))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no tenants registered (exfm tenants add NAME [--config tenant.yaml])")
        return 0
    head = f"{'tenant':<14}{'status':<9}{'variant':<16}{'windows':>8}{'last NE':>10}{'alone':>8}  "
    print(f"{head}{'served':<12}{'serving':<11}phase")
    for r in rows:
        ne, alone = (f"{r[k]:.4f}" if isinstance(r[k], float) else "-" for k in ("last_ne", "last_control_ne"))
        serving = r["serving"] or "-" if r["guard"] else "exfm (no guard)"
        print(
            f"{r['tenant']:<14}{r['status']:<9}{r['variant']:<16}{r['windows_trained']:>8}{ne:>10}{alone:>8}  "
            f"{r['served_version'] or '-':<12}{serving:<11}{r['phase'] or '-'}"
        )
        if r["guard"] and r["guard_reason"]:
            print(f"{'':<14}guard: {r['guard_reason']}")
    return 0
