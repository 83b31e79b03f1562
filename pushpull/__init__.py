"""The machinery both scripts share, one module per concern.

- wire:     the frame layout, its encoder and decoder
- runs:     per-run statistics (latency histogram, the run ledger, [RUN] line, JSON)
- confirm:  the confirmation channel between a receiver and --confirm senders
- push:     one sender worker's send path: outcomes, turns, backpressure
- health:   the sender's view of its receivers (link states, ZMTP heartbeats)
- security: CURVE certificates and keys; the receiver's gatekeeper and peer watch
- logs:     line formats and queue-based logging
- flow:     stop signals, the queues between threads, the sender's turns, the warm-stop drain
- threads:  a thread with a clear start and stop
- spill:    the receiver's spill file: load, save, remove
- summary:  [STATS] lines, --csv rows, the summary table, its JSON, the exit reason
- cli:      flag types, shared flags, JSON and table output

Standard library and pyzmq only, so both scripts run from a plain checkout
with requirements.txt installed.
"""
