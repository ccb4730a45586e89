// A small, reusable NetMQ client for sdxl-broker (the wire contract: CONTRACT.md). Copy this
// file into your service; it needs only NetMQ 4.x and System.Text.Json.
//
//   using var client = new SdxlBrokerClient("tcp://127.0.0.1:5555");
//   client.Progress += (_, p) => Console.WriteLine($"{p.Stage} {p.Step}/{p.TotalSteps}");
//   JsonObject reply = client.Generate(new JsonObject { ["prompt"] = "a fox", ["model_base"] = "tiny-sdxl" });
//   ...
//   NetMQConfig.Cleanup();   // once, when the process shuts down
//
// Reliability is the Lazy Pirate pattern, the same as the Python client's:
// - every request carries a request_id; each attempt uses a fresh DEALER socket (linger 0) and
//   sends the very same body again, so the broker attaches a resend to the running job (or
//   answers it from its stored reply), and a broker restart costs the caller nothing;
// - the receive loop is a NetMQPoller with the socket and a silence timer; any message from the
//   broker (a progress event too) resets the timer, so long jobs are fine;
// - first contact fails fast: when nothing at all arrives within ConnectTimeout, the request
//   fails naming the endpoint and the likely causes instead of retrying for minutes.
// The broker's frontend hands a reused socket identity over to the newest connection
// (ROUTER_HANDOVER). Every attempt of one request, and the cancel_request sent when its token
// is cancelled, use one random Options.Identity: without CURVE the broker lets only the
// connection (routing identity) that submitted a job cancel it.
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using NetMQ;
using NetMQ.Sockets;

namespace SdxlBroker;

/// <summary>A progress event: stage is queued, loading, denoising, refining or postprocessing
/// (accept other values: the broker may add stages).</summary>
public sealed record BrokerProgress(string RequestId, string Stage, int Step, int TotalSteps,
                                    int? QueuePosition, string? WorkerId);

/// <summary>The broker could not be reached, or stopped answering.</summary>
public sealed class BrokerUnavailableException : Exception
{
    public BrokerUnavailableException(string message) : base(message) { }
}

public sealed class SdxlBrokerClientOptions
{
    /// <summary>No message at all from the broker within this time: the request fails.</summary>
    public TimeSpan ConnectTimeout { get; init; } = TimeSpan.FromSeconds(5);
    /// <summary>Once the broker has answered: silence after which the request is resent.</summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>Unanswered resends in a row before giving up.</summary>
    public int Retries { get; init; } = 3;
}

public sealed class SdxlBrokerClient : IDisposable
{
    private readonly string _endpoint;
    private readonly SdxlBrokerClientOptions _options;

    /// <summary>Raised on the calling thread for every progress event of a request.</summary>
    public event EventHandler<BrokerProgress>? Progress;

    public SdxlBrokerClient(string endpoint, SdxlBrokerClientOptions? options = null)
    {
        _endpoint = endpoint;
        _options = options ?? new SdxlBrokerClientOptions();
    }

    /// <summary>A flat generate_sdxl_enhanced request (snake_case field names, CONTRACT.md);
    /// message_type, request_id and stream are filled in when missing. Returns the final reply
    /// (check "success"; "error_code" and "errors" say what went wrong).</summary>
    public JsonObject Generate(JsonObject fields, CancellationToken cancellation = default)
    {
        var body = (JsonObject)fields.DeepClone();
        body["message_type"] ??= "generate_sdxl_enhanced";
        body["request_id"] ??= Guid.NewGuid().ToString("N");
        body["stream"] ??= true;   // progress events: they also tell us the job is alive
        return Request(body, cancellation);
    }

    public JsonObject Status() =>
        Request(new JsonObject { ["message_type"] = "status_request", ["request_id"] = NewId() });

    /// <summary>Cancel a queued or running job by its request_id, from a new connection: the
    /// broker allows it for the job's CURVE key or an admin key, on its --local-frontend, or
    /// with --allow-local-cancel; a job this client is waiting for is cancelled through the
    /// CancellationToken of its request (the same routing identity).</summary>
    public JsonObject Cancel(string requestId) =>
        Request(new JsonObject
        {
            ["message_type"] = "cancel_request",
            ["request_id"] = NewId(),
            ["data"] = new JsonObject { ["request_id"] = requestId },
        });

    /// <summary>Send any request body and return its one final reply. Cancelling the token
    /// stops waiting and sends a cancel_request for the job (then throws
    /// OperationCanceledException).</summary>
    public JsonObject Request(JsonObject body, CancellationToken cancellation = default)
    {
        body["request_id"] ??= NewId();
        return Request(body, NewIdentity(), cancellation);
    }

    private JsonObject Request(JsonObject body, byte[] identity, CancellationToken cancellation)
    {
        var requestId = body["request_id"]!.GetValue<string>();
        var frame = JsonSerializer.SerializeToUtf8Bytes(body);
        var exchange = new Exchange(this, requestId, frame, identity);
        exchange.Run(cancellation);
        if (exchange.Reply is null)
        {
            if (cancellation.IsCancellationRequested)
            {
                if (body["message_type"]?.GetValue<string>() != "cancel_request")
                    TryCancel(requestId, identity);
                cancellation.ThrowIfCancellationRequested();
            }
            throw new BrokerUnavailableException(exchange.Failure ?? "no reply");
        }
        return exchange.Reply;
    }

    /// <summary>The cancel of a job this client is waiting for, as the connection that
    /// submitted it (the same routing identity).</summary>
    private void TryCancel(string requestId, byte[] identity)
    {
        var body = new JsonObject
        {
            ["message_type"] = "cancel_request",
            ["request_id"] = NewId(),
            ["data"] = new JsonObject { ["request_id"] = requestId },
        };
        try { Request(body, identity, CancellationToken.None); }
        catch (BrokerUnavailableException) { /* nobody to tell; the job times out on the broker */ }
    }

    private static string NewId() => Guid.NewGuid().ToString("N");

    /// <summary>A random routing identity (not starting with a zero byte: ZeroMQ reserves those).</summary>
    private static byte[] NewIdentity()
    {
        var identity = Guid.NewGuid().ToByteArray();
        identity[0] = 1;
        return identity;
    }

    public void Dispose() { /* sockets live only inside a request */ }

    /// <summary>One request: a fresh socket per attempt, a poller, a silence timer.</summary>
    private sealed class Exchange
    {
        private readonly SdxlBrokerClient _client;
        private readonly string _requestId;
        private readonly byte[] _frame;
        private readonly byte[] _identity;   // the same for every attempt: the job's owner
        private bool _heard;          // the broker has answered this request
        private int _unanswered;      // resends in a row that got nothing back
        public JsonObject? Reply { get; private set; }
        public string? Failure { get; private set; }

        public Exchange(SdxlBrokerClient client, string requestId, byte[] frame, byte[] identity)
        {
            _client = client;
            _requestId = requestId;
            _frame = frame;
            _identity = identity;
        }

        public void Run(CancellationToken cancellation)
        {
            var options = _client._options;
            var socket = Open();
            var timer = new NetMQTimer(options.ConnectTimeout);
            using var poller = new NetMQPoller { socket, timer };
            using var stopOnCancel = cancellation.Register(() => poller.StopAsync());

            void OnReceive(object? sender, NetMQSocketEventArgs e)
            {
                NetMQMessage? message = null;
                while (e.Socket.TryReceiveMultipartMessage(TimeSpan.Zero, ref message))
                {
                    if (!Handle(message!.Last.ConvertToString(Encoding.UTF8)))
                        continue;
                    _heard = true;
                    _unanswered = 0;
                    timer.Interval = (int)options.Timeout.TotalMilliseconds;   // also resets it
                    if (Reply is not null)
                    {
                        poller.Stop();
                        return;
                    }
                }
            }

            socket.ReceiveReady += OnReceive;
            timer.Elapsed += (_, _) =>
            {
                if (!_heard)
                {
                    Failure = $"no answer from {_client._endpoint} within {options.ConnectTimeout.TotalSeconds:0.#} s: " +
                              "is `sdxl-broker serve` running there, is the endpoint right, and if the broker " +
                              "uses CURVE, does this client have its keys?";
                    poller.Stop();
                    return;
                }
                if (_unanswered >= options.Retries)
                {
                    Failure = $"the broker at {_client._endpoint} stopped answering request {_requestId} " +
                              $"({options.Retries} resends unanswered)";
                    poller.Stop();
                    return;
                }
                _unanswered++;
                // Lazy Pirate: the old socket may be stuck on a dead connection; a fresh one
                // sends the very same frame, same request_id
                poller.Remove(socket);
                socket.ReceiveReady -= OnReceive;
                socket.Dispose();
                socket = Open();
                socket.ReceiveReady += OnReceive;
                poller.Add(socket);
            };
            try
            {
                poller.Run();
            }
            finally
            {
                socket.Dispose();
            }
        }

        private DealerSocket Open()
        {
            var socket = new DealerSocket();
            socket.Options.Linger = TimeSpan.Zero;
            socket.Options.Identity = _identity;
            socket.Connect(_client._endpoint);
            // ["", body]: the REQ-style envelope; the reply comes back with the same envelope
            socket.SendMoreFrameEmpty().SendFrame(_frame);
            return socket;
        }

        /// <summary>True when the frame belongs to this request (a progress event or the
        /// final reply, which is then in Reply).</summary>
        private bool Handle(string text)
        {
            JsonObject? json;
            try { json = JsonNode.Parse(text) as JsonObject; }
            catch (JsonException) { return false; }
            if (json is null)
                return false;
            var id = json["request_id"]?.GetValue<string>();
            if (id is not null && id != _requestId)
                return false;   // a late reply to something else
            if (json["message_type"]?.GetValue<string>() == "progress" || json["final"]?.GetValue<bool>() == false)
            {
                _client.Progress?.Invoke(_client, new BrokerProgress(
                    _requestId, json["stage"]?.GetValue<string>() ?? "?",
                    json["step"]?.GetValue<int>() ?? 0, json["total_steps"]?.GetValue<int>() ?? 0,
                    json["queue_position"]?.GetValue<int>(), json["worker_id"]?.GetValue<string>()));
                return true;
            }
            Reply = json;
            return true;
        }
    }
}
