import json, glob
order = ["A_1_ping","B_1_ping","Bdirect_1_ping","A_1_single","B_1_single","Bdirect_1_single",
         "A_200","A_200_r2","B_200","B_200_r2","A_1000","A_1000_r2","A_1000_c32","B_1000","B_1000_r2",
         "A_2000","A_2000_60s","A_2000_noka","B_2000","B_2000_60s","Bdirect_2000","C_2000","C_2000_r2",
         "A_2000_idle","B_2000_idle","A_4000_idle","B_4000_idle","B_4000_idle_ch16"]
print("| run | opened/N | errors (code:count) | lost | turns/s | msgs/s (c+s) | TTFT p50 / p99 / max ms | turn p50 / p99 ms | CPU %core ingress / replicas(sum) / loadgen / other | busy % | RSS MB ingress idle→steady→end | RSS MB replica (each) idle→steady→end |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for n in order:
    try: r = json.load(open(f"results/{n}.json"))
    except FileNotFoundError: continue
    l = r["loadgen"]; c = r["cpu_pct_of_one_core_steady"]
    ing = "proxy" if r["design"] in ("A","C") else "forwarder"
    errs = {k:v for k,v in l["errors"].items() if not k.startswith("detail")}
    nf = l["open_failed"] + l.get("stuck_never_opened",0)
    lost = l["lost"] + l.get("stuck_mid_turn",0)
    err_s = ", ".join(f"{k}:{v}" for k,v in errs.items()) or "0"
    ingcpu = c.get(ing,0) if r["design"] in ("A","B") else (f"{c.get('proxy',0)} (idle proxy)" if r["design"]=="C" else "–")
    def rss(lab):
        a=r["rss_mb_idle"].get(lab,[0]); b=r["rss_mb_steady_start"].get(lab,[0]); e=r["rss_mb_steady_end"].get(lab,[0])
        return f"{int(max(a))}→{int(max(b))}→{int(max(e))}"
    print(f"| {n} | {l['opened_ok']}/{l['n']}" + (f" ({nf} never served)" if nf else "") + f" | {err_s} | {lost} | {l['steady_turns_per_s']} | {l['steady_msgs_per_s(client+server)']} | {l['ttft_ms_p50']} / {l['ttft_ms_p99']} / {l['ttft_ms_max']} | {l['turn_ms_p50']} / {l['turn_ms_p99']} | {ingcpu} / {c.get('replica')} / {c.get('loadgen')} / {r.get('unlabeled_cpu_pct_of_one_core_steady')} | {r['machine_busy_pct_steady(2 cores)']} | " + (rss(ing) if r['design']!='Bdirect' else '–') + f" | {rss('replica')} |")
