// Sends OpenTelemetry GenAI spans to `llmpulse serve` with the JavaScript SDK's OTLP/HTTP exporter
// (@opentelemetry/exporter-trace-otlp-http, JSON encoding), the way an instrumented Node service would.
//
//   node send_spans.mjs <base-url> <api-key> [calls]
//
// One trace: an HTTP server span (not GenAI: ignored by llmpulse), `calls` chat spans in the current
// semantic conventions, and one span with the older names (gen_ai.system, gen_ai.usage.prompt_tokens).
// Prints what was sent as JSON on stdout; exits 1 when an export did not succeed.
import { SpanKind, trace, ROOT_CONTEXT } from "@opentelemetry/api";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BasicTracerProvider, BatchSpanProcessor } from "@opentelemetry/sdk-trace-base";

const [base, apiKey, callsArg] = process.argv.slice(2);
if (!base || !apiKey) {
  console.error("usage: node send_spans.mjs <base-url> <api-key> [calls]");
  process.exit(2);
}
const calls = Number(callsArg ?? 5);

const exporter = new OTLPTraceExporter({
  url: `${base}/v1/traces`,
  headers: { Authorization: `Bearer ${apiKey}` },
});
const results = [];
// Records each export's outcome (the SDK itself only logs failures).
const recording = {
  export(spans, done) {
    exporter.export(spans, (result) => {
      results.push(result);
      done(result);
    });
  },
  shutdown: () => exporter.shutdown(),
  forceFlush: () => exporter.forceFlush(),
};

const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ "service.name": "js-checkout", "llmpulse.team": "payments" }),
  spanProcessors: [new BatchSpanProcessor(recording, { scheduledDelayMillis: 50 })],
});
const tracer = provider.getTracer("llmpulse-otel-js-test", "1.0.0");

const now = Date.now();
const root = tracer.startSpan("POST /checkout", {
  kind: SpanKind.SERVER,
  startTime: now - 120_000,
  attributes: { "http.request.method": "POST", "http.route": "/checkout" },
});
const parent = trace.setSpan(ROOT_CONTEXT, root);

const sent = [];
for (let i = 0; i < calls; i++) {
  const start = now - 90_000 + i * 1000;
  const usage = { input: 1200 + i, output: 300 + i, cached: 200 };
  const span = tracer.startSpan(
    "chat gpt-4o-mini",
    {
      kind: SpanKind.CLIENT,
      startTime: start,
      attributes: {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.request.temperature": 0.2,
        "gen_ai.usage.input_tokens": usage.input,
        "gen_ai.usage.output_tokens": usage.output,
        "gen_ai.usage.cache_read.input_tokens": usage.cached,
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.response.id": `chatcmpl-js-${i}`,
        "app.feature": "checkout-assistant",
      },
    },
    parent,
  );
  span.end(start + 1500);
  sent.push({ span_id: span.spanContext().spanId, model: "gpt-4o-mini", ...usage, latency_ms: 1500 });
}

// older attribute names, no operation name: still a model call (it names a model and reports usage)
const oldStart = now - 30_000;
const old = tracer.startSpan(
  "anthropic.messages",
  {
    kind: SpanKind.CLIENT,
    startTime: oldStart,
    attributes: {
      "gen_ai.system": "anthropic",
      "gen_ai.request.model": "claude-haiku-4-5",
      "gen_ai.usage.prompt_tokens": 500,
      "gen_ai.usage.completion_tokens": 50,
      "app.feature": "checkout-assistant",
    },
  },
  parent,
);
old.end(oldStart + 800);
sent.push({ span_id: old.spanContext().spanId, model: "claude-haiku-4-5", input: 500, output: 50, cached: 0, latency_ms: 800 });

root.end(now - 1000);
await provider.forceFlush();
await provider.shutdown();

const failed = results.filter((r) => r.code !== 0).map((r) => String(r.error ?? r.code));
process.stdout.write(
  JSON.stringify({ trace_id: root.spanContext().traceId, spans: sent, exports: results.length, failed }) + "\n",
);
process.exit(failed.length || results.length === 0 ? 1 : 0);
