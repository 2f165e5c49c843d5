"""The aggregator service: rounds, intake, FedAvg, global models (``fedmq-aggregator``)."""
