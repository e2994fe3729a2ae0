# HTTP errors by path over the last 5 minutes (statuses 400 and up), as the servers answered them.
import px

df = px.DataFrame(table="http_events", start_time="-5m")
df = df[(df.trace_role == "server") & (df.resp_status >= 400)]
df = df.groupby(["req_path", "resp_status"]).agg(count=("latency", px.count))
px.display(df.sort("count", ascending=False), "http_errors")
