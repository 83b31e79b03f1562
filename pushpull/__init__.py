"""The machinery both scripts share, one module per concern.

- wire:     the frame layout, its encoder and decoder
- runs:     per-run statistics (the run ledger, [RUN] line, JSON)
- latency:  the mergeable latency histogram (p50 ... max within 1 %)
- channel:  the confirmation channel's format, and the receiver's publisher on it
- listener: the sender's confirmation listener: each receiver's channel, its reports
- verdict:  the receivers' reports of a run, merged, and the gates judged on them
- push:     one sender worker's send path: outcomes, turns, backpressure
- windows:  --confirm on the sender: each worker's unconfirmed window, when to resend
- health:   the sender's view of its receivers (link states, ZMTP heartbeats)
- links:    a worker's connections kept in step with the heartbeat; TCP keepalive
- schedule: when each message is due (--delay, --rate), and the schedule's clock
- security: CURVE certificates and keys, the client's and the server's
- gatekeeper: the receiver's ZAP gatekeeper and its watch over who connects
- logs:     line formats and queue-based logging
- sendflow:    the sender's turns to send, its flush deadline, the in-flight bound
- receiveflow: the receiver's batch queue between its threads, its stops, the warm-stop drain
- stopsignals: Ctrl+C and SIGTERM counted for either script's main thread
- threads:  a thread with a clear start and stop
- spill:    the receiver's spill file: load, save, remove
- sender_summary:   the sender's [STATS] line, --csv row, summary table, JSON, exit reason
- receiver_summary: the receiver's [STATS] line, --csv row, summary table, JSON
- findmax:  --find-max: the capacity search, one run per step, and its table and answer
- cli:      flag types, shared flags, JSON and table output
- metrics:  --metrics-port: the Prometheus endpoint, read at scrape time (docs/metrics.md)
- scrape:   --metrics-port: the HTTP server that answers the scrapes
- hlog:     --hlog: the HdrHistogram interval log of latency per stats interval

Standard library and pyzmq only, so both scripts run from a plain checkout
with requirements.txt installed; metrics and hlog import their optional packages
(requirements-metrics.txt) only when their flag is given.
"""
