// A small NetMQ console program that talks to sdxl-broker the way an existing C# service would:
// one DEALER socket, one generate_sdxl_enhanced request (JSON, System.Text.Json), progress
// messages while it runs, then the one final reply with the image paths.
//
//   dotnet run -- [endpoint] [prompt]
//   dotnet run -- tcp://127.0.0.1:5555 "a lighthouse at dusk"
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using NetMQ;
using NetMQ.Sockets;

var endpoint = args.Length > 0 ? args[0] : "tcp://127.0.0.1:5555";
var prompt = args.Length > 1 ? args[1] : "a lighthouse at dusk, oil painting";
var requestId = Guid.NewGuid().ToString();

// The flat C# form (CONTRACT.md "Message types"). Field names are snake_case on the wire.
var request = new Dictionary<string, object?>
{
    ["message_type"] = "generate_sdxl_enhanced",
    ["request_id"] = requestId,
    ["prompt"] = prompt,
    ["negative_prompt"] = "blurry",
    ["model_base"] = "tiny-sdxl",           // a name under the broker's --models-dir
    ["width"] = 256,
    ["height"] = 256,
    ["steps"] = 4,
    ["guidance_scale"] = 5.0,
    ["seed"] = 42,
    ["scheduler"] = "DPM++ 2M Karras",
    ["lora_names"] = new[] { "tiny-lora-a" },
    ["lora_paths"] = new[] { "loras/tiny-lora-a.safetensors" },
    ["lora_weights"] = new[] { 0.8 },
    ["output_format"] = "png",
    ["stream"] = true,                      // progress messages (DEALER peers only)
    ["timeout"] = 120,
};
var body = JsonSerializer.SerializeToUtf8Bytes(request);

using var dealer = new DealerSocket();
dealer.Options.Identity = Encoding.UTF8.GetBytes($"csharp-{requestId[..8]}");
dealer.Connect(endpoint);

// A DEALER may send ["", body] (REQ-style envelope) or just [body]; the reply mirrors it.
var outgoing = new NetMQMessage();
outgoing.AppendEmptyFrame();
outgoing.Append(body);
dealer.SendMultipartMessage(outgoing);
Console.WriteLine($"sent {requestId} to {endpoint}");

var deadline = DateTime.UtcNow.AddSeconds(180);
while (DateTime.UtcNow < deadline)
{
    NetMQMessage? reply = null;
    if (!dealer.TryReceiveMultipartMessage(TimeSpan.FromSeconds(1), ref reply) || reply is null)
        continue;
    var json = JsonNode.Parse(reply.Last.ConvertToString(Encoding.UTF8))!;
    if (json["final"]?.GetValue<bool>() != true)
    {
        // {message_type: "progress", stage, step, total_steps, queue_position, worker_id}
        Console.WriteLine($"  {json["stage"]} {json["step"]}/{json["total_steps"]}"
                          + (json["queue_position"] is JsonNode q ? $" (queue position {q})" : ""));
        continue;
    }
    if (json["success"]?.GetValue<bool>() == true)
    {
        foreach (var image in json["data"]!["generated_images"]!.AsArray())
            Console.WriteLine($"image {image!["index"]}: {image["path"]} seed={image["seed"]} sha256={image["sha256"]}");
        var metrics = json["data"]!["processing_metrics"];
        Console.WriteLine($"total {metrics?["total_time"]} s on {metrics?["device_name"]} ({metrics?["worker_id"]})");
        return 0;
    }
    Console.Error.WriteLine($"failed: {json["error_code"]}: {json["error"]}");
    foreach (var e in json["errors"]?.AsArray() ?? new JsonArray())
        Console.Error.WriteLine($"  {e!["field"]}: {e["message"]}");
    return 1;
}
Console.Error.WriteLine("no final reply within 180 s");
return 2;
