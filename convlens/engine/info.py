"""``convlens info STORE``: what a store holds, how far its run got, what failed."""

from __future__ import annotations

import numpy as np

from convlens.engine import schema, store


def info_text(path, storage_options=None, failures: int = 10) -> str:
    root = store.open_store(path, "r", storage_options)
    a = dict(root.attrs)
    lines = [f"store      {path}",
             f"model      {a.get('model')} ({a.get('model_source')}, sha256 {str(a.get('weights_sha256'))[:12]}), "
             f"input {a.get('input_size')}, preprocessing {a.get('preprocessing')}",
             f"written    {a.get('created')} by convlens {a.get('convlens_version')} ({a.get('command')})"]
    if a.get("source"):
        lines.append(f"data       {a['source']}; resize {a.get('resize')}; target {a.get('target')}")
    tr = a.get("training")
    if tr:
        secs = tr.get("record_seconds") or []
        lines.append(f"training   {', '.join(tr.get('methods', []))} recorded after epochs {tr.get('epochs', [])}"
                     + (f"; {secs[0]:.2f} s the first time, then {np.mean(secs[1:] or secs):.2f} s each" if secs
                        else ""))
    arrays = schema.describe(root)
    if "status" in arrays:
        status = np.asarray(root["status"][:])
        n = len(status)
        done, failed = int((status == schema.DONE).sum()), int((status == schema.FAILED).sum())
        pending = n - done - failed
        state = "complete" if pending == 0 else f"INCOMPLETE: {pending} pending (continue with --resume)"
        lines.append(f"progress   {done} done, {failed} failed, {pending} pending of {n} ({state})")
        run = a.get("run") or {}
        if run.get("seconds"):
            lines.append(f"timing     {run['seconds']:.1f} s, {run.get('items_per_second', 0):.2f} items/s, "
                         f"{run.get('processes', 1)} process(es)")
        per = run.get("method_seconds_per_item") or {}
        if per:
            lines.append("cost       " + ", ".join(f"{m} {s * 1000:.1f} ms/item" for m, s in per.items()))
        if failed:
            ids, errors = root["ids"][:], root["errors"][:]
            bad = np.flatnonzero(status == schema.FAILED)
            lines.append(f"failures   ({failed})")
            for i in bad[:failures]:
                lines.append(f"  {ids[i]}: {errors[i]}")
            if failed > failures:
                lines.append(f"  ... and {failed - failures} more")
    for m, entry in (a.get("methods") or {}).items():
        cfg = ", ".join(f"{k}={v}" for k, v in entry.get("config", {}).items())
        lines.append(f"method     {m}" + (f" ({cfg})" if cfg else ""))
    lines.append("arrays")
    for name, d in arrays.items():
        lines.append(f"  {name:34s} {str(list(d['shape'])):22s} {d['dtype']:8s} ({', '.join(d['dims'])})")
    return "\n".join(lines)
