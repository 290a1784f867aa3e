package dev.metronome.peer;

import java.nio.ByteBuffer;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicLong;

import com.google.protobuf.InvalidProtocolBufferException;
import metronome.v1.Metronome.KeyAction;
import metronome.v1.Metronome.KeyEvent;
import metronome.v1.Metronome.KeyEventBatch;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

/**
 * The processor's timing job in Kafka Streams, the peer the stream benchmark measures against.
 *
 * <p>Per user (record key), the last 50 key presses in a RocksDB-backed store with a changelog;
 * every 10 presses from the 30th, the original system's interval rule scores the window (the
 * share of intervals in the most common 10 ms bin) and an alert record goes out when the share is
 * at least 0.6. Input: {@code KeyEventBatch} Protobuf records; exactly once ({@code
 * exactly_once_v2}). The same job as the Quix Streams peer under {@code ../shared/peers/}.
 *
 * <p>Usage: {@code TimingJob BOOTSTRAP INPUT_TOPIC ALERT_TOPIC APPLICATION_ID STATE_DIR THREADS}.
 * Prints {@code state RUNNING} once its tasks run, and on SIGTERM closes and prints one JSON
 * line of counts. The benchmark times it by its group's committed offsets, as the processor.
 */
public final class TimingJob {
    static final int WINDOW = 50;
    static final int HOP = 10;
    static final int FIRST = 30;
    static final double ALERT_AT = 0.6;
    static final long BIN_US = 10_000;

    static final AtomicLong RECORDS = new AtomicLong();
    static final AtomicLong EVENTS = new AtomicLong();
    static final AtomicLong ALERTS = new AtomicLong();
    static final AtomicLong UNDECODABLE = new AtomicLong();

    public static void main(String[] args) throws InterruptedException {
        if (args.length != 6) {
            System.err.println(
                    "usage: TimingJob BOOTSTRAP INPUT_TOPIC ALERT_TOPIC APPLICATION_ID STATE_DIR THREADS");
            System.exit(2);
        }
        String bootstrap = args[0], input = args[1], alerts = args[2], appId = args[3], stateDir = args[4];
        int threads = Integer.parseInt(args[5]);

        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        props.put(StreamsConfig.STATE_DIR_CONFIG, stateDir);
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, threads);
        props.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");

        KafkaStreams streams = new KafkaStreams(topology(input, alerts), props);
        CountDownLatch stopped = new CountDownLatch(1);
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.RUNNING) {
                System.out.println("state RUNNING");
                System.out.flush();
            }
            if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
                stopped.countDown();
            }
        });
        streams.setUncaughtExceptionHandler(e -> {
            e.printStackTrace();
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close();
            System.out.printf(
                    "{\"peer\":\"kafka-streams\",\"records\":%d,\"events\":%d,\"alerts\":%d,\"undecodable\":%d}%n",
                    RECORDS.get(), EVENTS.get(), ALERTS.get(), UNDECODABLE.get());
            System.out.flush();
        }));
        streams.start();
        stopped.await();
    }

    static Topology topology(String input, String alerts) {
        Topology t = new Topology();
        t.addSource("events", Serdes.String().deserializer(), Serdes.ByteArray().deserializer(), input);
        t.addProcessor("timing", TimingProcessor::new, "events");
        t.addStateStore(
                Stores.keyValueStoreBuilder(
                                Stores.persistentKeyValueStore("presses"), Serdes.String(), Serdes.ByteArray())
                        // As the DSL's stores: writes gather in the record cache until a commit,
                        // so a user's many records a commit interval reach RocksDB and the
                        // changelog once.
                        .withCachingEnabled(),
                "timing");
        t.addSink("alerts", alerts, Serdes.String().serializer(), Serdes.String().serializer(), "timing");
        return t;
    }

    /** One user's presses: how many so far, and the last {@link #WINDOW} press times. */
    static final class Presses {
        long count;
        final long[] times = new long[WINDOW];
        int len;

        static Presses decode(byte[] bytes) {
            Presses p = new Presses();
            if (bytes == null) {
                return p;
            }
            ByteBuffer b = ByteBuffer.wrap(bytes);
            p.count = b.getLong();
            p.len = b.remaining() / Long.BYTES;
            for (int i = 0; i < p.len; i++) {
                p.times[i] = b.getLong();
            }
            return p;
        }

        byte[] encode() {
            ByteBuffer b = ByteBuffer.allocate(Long.BYTES * (1 + len));
            b.putLong(count);
            for (int i = 0; i < len; i++) {
                b.putLong(times[i]);
            }
            return b.array();
        }

        void push(long timeUs) {
            if (len == WINDOW) {
                System.arraycopy(times, 1, times, 0, WINDOW - 1);
                len--;
            }
            times[len++] = timeUs;
            count++;
        }

        /** The share of intervals in the most common 10 ms bin (intervals rounded to a bin). */
        double score() {
            if (len < 2) {
                return 0.0;
            }
            Map<Long, Integer> bins = new HashMap<>();
            int best = 0;
            for (int i = 1; i < len; i++) {
                // Half to even, as the Quix Streams peer's Python round().
                long bin = (long) Math.rint((times[i] - times[i - 1]) / (double) BIN_US);
                best = Math.max(best, bins.merge(bin, 1, Integer::sum));
            }
            return best / (double) (len - 1);
        }
    }

    static final class TimingProcessor implements Processor<String, byte[], String, String> {
        private ProcessorContext<String, String> context;
        private KeyValueStore<String, byte[]> store;

        @Override
        public void init(ProcessorContext<String, String> context) {
            this.context = context;
            this.store = context.getStateStore("presses");
        }

        @Override
        public void process(Record<String, byte[]> record) {
            RECORDS.incrementAndGet();
            KeyEventBatch batch;
            try {
                batch = KeyEventBatch.parseFrom(record.value());
            } catch (InvalidProtocolBufferException | NullPointerException e) {
                UNDECODABLE.incrementAndGet();
                return;
            }
            EVENTS.addAndGet(batch.getEventsCount());
            String user = record.key();
            Presses presses = Presses.decode(store.get(user));
            for (KeyEvent event : batch.getEventsList()) {
                if (event.getAction() != KeyAction.KEY_ACTION_DOWN) {
                    continue;
                }
                presses.push(event.getEventTimeUs());
                if (presses.count >= FIRST && (presses.count - FIRST) % HOP == 0) {
                    double score = presses.score();
                    if (score >= ALERT_AT) {
                        ALERTS.incrementAndGet();
                        String alert = String.format(
                                "{\"user_id\":\"%s\",\"score\":%.4f,\"window_end_us\":%d}",
                                batch.getUserId().replace("\\", "\\\\").replace("\"", "\\\""),
                                score,
                                presses.times[presses.len - 1]);
                        context.forward(new Record<>(user, alert, record.timestamp()));
                    }
                }
            }
            store.put(user, presses.encode());
        }
    }
}
