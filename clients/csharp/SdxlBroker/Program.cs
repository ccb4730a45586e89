// The client class in use: one generation with progress, Ctrl-C cancels the job on the broker.
//
//   dotnet run -- [endpoint] [prompt]
//   dotnet run -- tcp://127.0.0.1:5555 "a lighthouse at dusk"
//
// Exit codes: 0 done, 1 the broker reported a failure, 2 broker unreachable, 130 cancelled.
using System.Text.Json.Nodes;
using NetMQ;
using SdxlBroker;

var endpoint = args.Length > 0 ? args[0] : "tcp://127.0.0.1:5555";
var prompt = args.Length > 1 ? args[1] : "a lighthouse at dusk, oil painting";

using var cancel = new CancellationTokenSource();
Console.CancelKeyPress += (_, e) => { e.Cancel = true; cancel.Cancel(); };

try
{
    using var client = new SdxlBrokerClient(endpoint);
    client.Progress += (_, p) => Console.WriteLine(p.Stage == "queued"
        ? $"  queued ({p.QueuePosition ?? 0} ahead)"
        : $"  {p.Stage} {p.Step}/{p.TotalSteps} on {p.WorkerId}");

    // The flat C# form (CONTRACT.md "Message types"); field names are snake_case on the wire.
    var request = new JsonObject
    {
        ["request_id"] = Guid.NewGuid().ToString("N"),
        ["prompt"] = prompt,
        ["negative_prompt"] = "blurry",
        ["model_base"] = "tiny-sdxl",            // a name under the broker's --models-dir
        ["width"] = 256,
        ["height"] = 256,
        ["steps"] = 4,
        ["guidance_scale"] = 5.0,
        ["seed"] = 42,
        ["scheduler"] = "DPM++ 2M Karras",
        ["lora_names"] = new JsonArray("tiny-lora-a"),
        ["lora_weights"] = new JsonArray(0.8),
        ["output_format"] = "png",
        ["timeout"] = 120,
    };
    Console.WriteLine($"request {request["request_id"]} -> {endpoint}");
    var reply = client.Generate(request, cancel.Token);

    if (reply["success"]?.GetValue<bool>() == true)
    {
        foreach (var image in reply["data"]!["generated_images"]!.AsArray())
            Console.WriteLine($"image {image!["index"]}: {image["path"]} seed={image["seed"]}");
        var metrics = reply["data"]!["processing_metrics"];
        Console.WriteLine($"done in {metrics?["total_time"]} s on {metrics?["worker_id"]}");
        return 0;
    }
    Console.Error.WriteLine($"failed ({reply["error_code"]}): {reply["error"]}");
    foreach (var problem in reply["errors"]?.AsArray() ?? new JsonArray())
        Console.Error.WriteLine($"  {problem!["field"]}: {problem["message"]}");
    return 1;
}
catch (BrokerUnavailableException e)
{
    Console.Error.WriteLine($"error: {e.Message}");
    return 2;
}
catch (OperationCanceledException)
{
    Console.Error.WriteLine("cancelled");
    return 130;
}
finally
{
    NetMQConfig.Cleanup();   // stops NetMQ's background threads so the process can exit
}
