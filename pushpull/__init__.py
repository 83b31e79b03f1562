"""The machinery both scripts share, one module per concern.

- wire:     the frame layout, its encoder and decoder
- runs:     per-run statistics (latency histogram, run ledger, [RUN] line)
- confirm:  the confirmation channel between a receiver and --confirm senders
- push:     one sender worker's send path: outcomes, turns, backpressure
- health:   the sender's view of its receivers (link states)
- security: CURVE certificates and keys
- logs:     line formats and queue-based logging
- flow:     stop signals, the queues between threads, the sender's turns
- threads:  a thread with a clear start and stop
- cli:      flag types, shared flags, JSON and table output

Standard library and pyzmq only, so both scripts run from a plain checkout
with requirements.txt installed.
"""
