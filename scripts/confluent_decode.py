#!/usr/bin/env python3
"""Decode one record of every catalogue topic with Confluent's own Python client.

Proves the Rust producers write the Confluent wire format (magic byte, schema id, Avro) that
any standard client reads through a Confluent-compatible registry.

Usage: confluent_decode.py PREFIX    (KAFKA_BROKERS and SCHEMA_REGISTRY_URL from the env)
"""
import os
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

# topic -> a field every record of it carries
TOPICS = {
    "members": "member_id",
    "products": "product_id",
    "usage-records": "usage_id",
    "bills": "bill_id",
    "email-requests": "delivery_id",
    "sms-requests": "delivery_id",
    "dead-letters": "source_topic",
}


def first_record(consumer, topic, timeout=30.0):
    meta = consumer.list_topics(topic, timeout=10)
    parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.topics[topic].partitions]
    consumer.assign(parts)
    deadline = time.time() + timeout
    while time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            raise RuntimeError(f"{topic}: {msg.error()}")
        return msg
    raise RuntimeError(f"{topic}: no record within {timeout}s")


def main():
    prefix = sys.argv[1]
    registry = SchemaRegistryClient({"url": os.environ["SCHEMA_REGISTRY_URL"]})
    deserializer = AvroDeserializer(registry)
    passed = failed = 0
    for name, field in TOPICS.items():
        topic = prefix + name
        consumer = Consumer({
            "bootstrap.servers": os.environ["KAFKA_BROKERS"],
            "group.id": prefix + "confluent-check",
            "enable.auto.commit": False,
        })
        try:
            msg = first_record(consumer, topic)
            value = deserializer(msg.value(), SerializationContext(topic, MessageField.VALUE))
            if not isinstance(value, dict) or field not in value:
                raise RuntimeError(f"decoded value lacks {field}: {value!r}")
            print(f"ok   {topic}: {field}={value[field]!r}")
            passed += 1
        except Exception as e:  # report every topic, then fail
            print(f"FAIL {topic}: {e}")
            failed += 1
        finally:
            consumer.close()
    print(f"confluent-decode: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
