import pika, sys
params = pika.URLParameters(sys.argv[1])
conn = pika.BlockingConnection(params)
ch = conn.channel()
ch.confirm_delivery()
ch.exchange_declare("pika-x", "topic", durable=True)
q = ch.queue_declare("", exclusive=True).method.queue
ch.queue_bind(q, "pika-x", "a.#")
props = pika.BasicProperties(content_type="text/plain", headers={"k": 1, "s": "v", "l": [1, "two"], "t": {"n": True}}, delivery_mode=2, priority=3, correlation_id="c", reply_to="r", expiration="60000", message_id="m", timestamp=1700000000, type="t", user_id="guest", app_id="a")
for i in range(100):
    ch.basic_publish("pika-x", "a.b.c", str(i).encode(), props, mandatory=True)
got = []
for m, p, body in ch.consume(q, inactivity_timeout=2):
    if m is None: break
    got.append(int(body)); ch.basic_ack(m.delivery_tag)
    assert p.headers == props.headers, p.headers
    assert p.priority == 3 and p.message_id == "m" and p.timestamp == 1700000000
    if len(got) == 100: break
assert got == list(range(100)), got
ch.cancel()
try:
    ch.queue_declare("nope", passive=True)
except pika.exceptions.ChannelClosedByBroker as e:
    assert e.reply_code == 404, e
ch = conn.channel()
ch.tx_select(); ch.basic_publish("", q, b"tx"); ch.tx_commit()
m, p, b = ch.basic_get(q, auto_ack=True)
assert b == b"tx"
ch.exchange_delete("pika-x")
conn.close()
print("pika OK")
