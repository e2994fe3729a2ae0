-- Find slow database queries: p99 latency per normalised statement over the last 5 minutes, above 100 ms.
-- The server's records (each statement once, timed as PostgreSQL saw it); latency is in nanoseconds.
SELECT req, count(*) AS count, quantile_cont(latency, 0.99) / 1e6 AS p99_ms
FROM pgsql_events
WHERE trace_role = 'server' AND ts >= epoch(now()) - 300
GROUP BY req
HAVING quantile_cont(latency, 0.99) / 1e6 > 100
ORDER BY p99_ms DESC
