import json, glob, sys
rows=[]
for f in sorted(glob.glob('/work/scratch/ray_proto/results/*.json')):
    if f.endswith('.loadgen.json'): continue
    r=json.load(open(f)); l=r['loadgen']; c=r['cpu_pct_of_one_core_steady']
    def rs(key, lab): 
        v=r[key].get(lab); return '+'.join(str(int(x)) for x in v) if v else '-'
    ing = 'proxy' if r['design'] in ('A','C') else 'forwarder'
    l["lost"]=(l.get("lost") or 0)+(l.get("stuck_mid_turn") or 0); l["open_failed"]=(l.get("open_failed") or 0)+(l.get("stuck_never_opened") or 0)
    print(f"{f.split('/')[-1][:-5]:14s} open={l.get('opened_ok')}/{l.get('n')} closedOK={l.get('closed_ok')} lost={l.get('lost')} openfail={l.get('open_failed')} stuck={l.get('stuck_cancelled')} err={l.get('errors')} badtok={l.get('bad_token_count')}"
          f" | turns/s={l.get('steady_turns_per_s')} msgs/s={l.get('steady_msgs_per_s(client+server)')} tok/s={l.get('steady_tokens_per_s')}"
          f" | ttft p50={l.get('ttft_ms_p50')} p99={l.get('ttft_ms_p99')} max={l.get('ttft_ms_max')} turn p50={l.get('turn_ms_p50')} p99={l.get('turn_ms_p99')}"
          f" | cpu%1core ingress={c.get(ing,0) if r['design']!='Bdirect' else 0} replicas={c.get('replica')} loadgen={c.get('loadgen')} ctrl={c.get('controller')} raycore={c.get('ray_core')} other={r.get('unlabeled_cpu_pct_of_one_core_steady')} busy={r['machine_busy_pct_steady(2 cores)']}%"
          f" | rss MB {ing} {rs('rss_mb_idle',ing)}->{rs('rss_mb_steady_start',ing)}->{rs('rss_mb_steady_end',ing)} replicas {rs('rss_mb_idle','replica')}->{rs('rss_mb_steady_start','replica')}->{rs('rss_mb_steady_end','replica')} loadgen {rs('rss_mb_steady_end','loadgen')}"
          f" | split={l.get('sessions_per_replica')} lag={ {k:(round(v['step_lag_avg_ms'],1),round(v['step_lag_max_ms'])) for k,v in r.get('replica_stats',{}).items()} }")
