# DNS queries that failed over the last 5 minutes (NXDOMAIN, SERVFAIL, REFUSED, ...), by name.
import px

df = px.DataFrame(table="dns_events", start_time="-5m")
df = df[(df.trace_role == "client") & (df.rcode != "NOERROR")]
df = df.groupby(["query_name", "query_type", "rcode"]).agg(count=("latency", px.count))
px.display(df.sort("count", ascending=False), "dns_failures")
