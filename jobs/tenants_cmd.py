"""`exfm tenants add|list|remove`: the tenant registry; on a running system, through its tenant manager."""

from __future__ import annotations

import argparse
import json
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
    from exfm_ray.configbase import read_yaml

    data = read_yaml(path) if path else {}
    if data.get("name", name) != name:
        raise ConfigError(f"{path}: field 'name' is {data['name']!r} but the command names tenant {name!r}")
    return {**data, "name": name}


def _manager(args):
    from actors.launch import find_tenant_manager
    from jobs.cluster import try_connect

    if not try_connect(args.address or Settings().ray_address):
        return None
    return find_tenant_manager()


def run_add(args: argparse.Namespace) -> int:
    import ray

    from exfm_ray.tenants.checks import validate
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


def run_list(args: argparse.Namespace) -> int:
    from exfm_ray.tenants.status import tenant_rows

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
