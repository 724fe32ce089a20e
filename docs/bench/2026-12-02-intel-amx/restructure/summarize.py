"""Median / spread per case and side of the base-vs-after JSONs in this folder -> a markdown table and summary.json."""
import json, glob, os, statistics as st, sys
D = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
rows = {}
for f in sorted(glob.glob(f"{D}/*_r*.json")):
    side, rest = os.path.basename(f).split("_", 1)
    d = json.load(open(f))
    for r in d["results"]:
        key = (r["op"], r["dtype"], r["size_label"])
        e = rows.setdefault(key, {}).setdefault(side, {"ours": [], "floor": [], "ratios": [], "inv": [], "mem": [], "load": []})
        if r["provider"] == "gemm-floor":
            e["floor"].append(r["floor_s"])
        elif r["provider"] == "ours" and r.get("status") == "ok":
            t = r["time"]["times_s"]
            e["ours"] += t
            e["inv"].append(r["ratio_to_floor"])
            e["mem"].append(r["memory"]["extra_bytes"] / 1e6)
        elif r["provider"] == "ours":
            print("NOT OK", f, r.get("status"), r.get("time", {}).get("status"))
    for key in {(r["op"], r["dtype"], r["size_label"]) for r in d["results"]}:
        rows[key][side]["load"].append((d["machine"].get("loadavg_start"), d["machine"].get("loadavg_end")))
    # per-repetition ratios against this invocation's floor
    fl = {(r["op"], r["dtype"], r["size_label"]): r["floor_s"] for r in d["results"] if r["provider"] == "gemm-floor"}
    for r in d["results"]:
        key = (r["op"], r["dtype"], r["size_label"])
        if r["provider"] == "ours" and r.get("status") == "ok" and key in fl:
            rows[key][side]["ratios"] += [t / fl[key] for t in r["time"]["times_s"]]
out = []
print("| op | dtype | size | base: ours s median [min-max] (n) | after: ours s median [min-max] (n) | after/base time | base ratio/floor per invocation | after ratio/floor per invocation | base floor s | after floor s | extra MB base / after |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for key, sides in rows.items():
    b, a = sides.get("base"), sides.get("after")
    if not b or not a or not b["ours"] or not a["ours"]:
        continue
    fmt = lambda x: f"{st.median(x):.3f} [{min(x):.3f}-{max(x):.3f}] ({len(x)})"
    print(f"| {key[0]} | {key[1]} | {key[2]} | {fmt(b['ours'])} | {fmt(a['ours'])} | {st.median(a['ours'])/st.median(b['ours']):.3f} | "
          f"{', '.join(f'{x:.2f}x' for x in b['inv'])} | {', '.join(f'{x:.2f}x' for x in a['inv'])} | "
          f"{', '.join(f'{x:.2f}' for x in b['floor'])} | {', '.join(f'{x:.2f}' for x in a['floor'])} | "
          f"{'/'.join(f'{x:.0f}' for x in b['mem'])} / {'/'.join(f'{x:.0f}' for x in a['mem'])} |")
    out.append({"op": key[0], "dtype": key[1], "size": key[2], "base": b, "after": a,
                "after_over_base_median_time": st.median(a['ours'])/st.median(b['ours']),
                "base_ratio_median": st.median(b["ratios"]), "after_ratio_median": st.median(a["ratios"])})
json.dump(out, open(f"{D}/summary.json", "w"), indent=1)
